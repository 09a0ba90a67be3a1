"""The `metanet` command line: parse options, call the library, render with rich."""
