"""Provider adapters: mock, OpenAI-compatible, Anthropic Messages and Azure OpenAI."""
