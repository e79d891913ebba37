"""One thin module per CLI command: each parses its config, calls the step that does the work and prints
what it wrote. `ctxaware.cli` dispatches to them; nothing else imports them."""
