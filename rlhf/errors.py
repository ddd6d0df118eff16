"""Errors that mean "the user's input is wrong": train.py prints them as one line, no traceback."""


class UserError(Exception):
    """Bad config, data or path; the message names what and where."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, caught before any model is built."""
