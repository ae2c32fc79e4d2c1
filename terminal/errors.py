"""The terminal layer's exception tree: every exception the terminal raises derives from
:class:`TerminalError`, and says by its kind how the operator is told about it.

* :class:`BadInput`: what the operator gave cannot be used (a request, a configuration value, a
  card, key, list or dump file); the message is one line naming it, and nothing was changed.
* :class:`Interrupted`: a card write was cut off midway; the journal holds it in doubt and the
  message says what to do (present the card again).
* any other :class:`TerminalError`: something that should not happen (a damaged or concurrently
  changed journal, a write-cycle step out of order): a fault to investigate.

Each class keeps the built-in base it had before this tree (``ValueError``, ``RuntimeError``), so
code that catches those still catches it. The CLI maps the kinds to exit statuses in one place
(``farebox.tools.cli``). Pure: this module imports nothing.
"""


class TerminalError(Exception):
    """Base of every error the terminal layer raises."""


class BadInput(TerminalError):
    """What the operator gave cannot be used; one line naming it, nothing changed."""


class Interrupted(TerminalError):
    """A card write was cut off after the journal intent: the write is in doubt until the card
    is seen again."""


__all__ = ["BadInput", "Interrupted", "TerminalError"]
