"""The inputs: SFT conversations, the needle-in-a-haystack prompts, the declarative evaluation tasks and their metrics."""
