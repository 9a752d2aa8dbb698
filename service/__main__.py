"""`python -m service [serve] [--model DIR ...]`: the same as the `lmserve` command."""

from service.cli import main

main()
