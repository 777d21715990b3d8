"""The measuring tools: what each acceleration and feature costs in speed and in image quality, and the proxy model
the quality figures are measured on (docs/development.md has a table of them: the question, the command, what it
needs).

They import the serving core (flux/) and are never imported by it or by the Cog adapter.
"""
