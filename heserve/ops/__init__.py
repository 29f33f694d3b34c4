"""Running heserve: settings from one table (flags, environment, TOML), the `heserve`
command, log formats and progress on standard error.
"""
