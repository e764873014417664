"""`python app.py [options]` is `persona-studio serve [options]`: build the app and launch it."""

import sys

from chatbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
