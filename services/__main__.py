"""``python -m services NAME``: run the wrapper named NAME in the profile."""

from services.wrapper.__main__ import main

if __name__ == "__main__":
    main()
