"""The large-batch ImageNet training app: `python -m train.main --help`."""


class FlagError(ValueError):
    """A flag's value is invalid; the message starts with the flag's name.

    Defined here, not in train/main.py, because `python -m train.main` runs
    that file as `__main__`: importing it again would define its flags twice.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag
