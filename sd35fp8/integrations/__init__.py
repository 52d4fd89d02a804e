"""Integrations with other runtimes, each in its own module and importing its framework only when used
(``sd35fp8.integrations.diffusers``)."""
