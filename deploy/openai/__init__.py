"""The OpenAI-compatible surface: protocol models, routes, the chat / completions / responses services, errors,
the response store."""
