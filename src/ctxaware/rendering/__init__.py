"""Step 1: chat-template rendering with role spans, the [IND] token, and the one generation engine that runs rendered prompts."""
