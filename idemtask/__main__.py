"""``python -m idemtask``: the same as the ``idemtask`` command."""

from idemtask.cli import main

if __name__ == "__main__":
    main()
