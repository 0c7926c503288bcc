"""The provisioning engine: hosts, facts, steps, handlers and the runner."""
