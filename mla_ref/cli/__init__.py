"""The command layer: argument parsing and printing for every ``python -m mla_ref`` command.

Each module here turns one command's arguments into a call of a library function and prints its result;
the library below never parses arguments or imports from here.
"""
