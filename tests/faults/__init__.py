"""Fault tests: stuck, dead or lying guests and damaged host files end in bounded time with a message a user can act on (issue 16)."""
