"""The command line: `launcher` is cli/main.py; each group of commands has its module here."""
