"""``python -m normbench`` runs the command-line tool."""

from normbench.cli import main

if __name__ == "__main__":
    main()
