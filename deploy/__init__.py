"""Ray Serve application, OpenAI protocol, harmony, gateway and the `epserve` command line."""
