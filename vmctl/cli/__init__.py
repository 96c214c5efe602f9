"""The ``vmctl`` command (``vmctl.cli:main``): the main parser and ``run``/``guest``/``doctor``
(:mod:`.main`), fleets (:mod:`.fleet`), detached sandboxes (:mod:`.detached`)."""

from vmctl.cli.main import main

__all__ = ["main"]
