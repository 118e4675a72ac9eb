import sys

try:
    from .cli import entry
except KeyboardInterrupt:  # Ctrl-C while still importing: the same quiet exit as later
    sys.exit(130)

entry()
