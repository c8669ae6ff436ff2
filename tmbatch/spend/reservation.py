"""One billed attempt's claim on the budget, from before it is sent until its answer.

Each billed attempt takes a `Reservation` before it is sent, as it takes a `limits.Ticket`:
its worst case, the estimated prompt (`tokens.prompt_tokens`, scaled up once usage has shown
the estimate to be low) plus its output ceiling. `budget.Budget` admits it, or makes it wait,
against spent + reserved.

When the answer arrives its reservation becomes the answer's `usage` (a stream counts what
arrived; an answer without `usage` counts its text by the same estimator). A failed attempt
counts nothing when its outcome's policy says the server did no work (`policy.refund`), and
its worst case otherwise (ambiguous: it may have been billed). Once sent and until answered
it is in flight: what a crash now would leave of unknown outcome (the journal's snapshot).

/tokenize and /detokenize are not billed: their attempts hold `FREE`, which counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tmbatch.policy import AttemptFailed
from tmbatch.spend.tokens import answer_text_tokens

if TYPE_CHECKING:
    from tmbatch.spend.budget import Budget


@dataclass(slots=True, eq=False)
class Reservation:
    """One billed attempt's claim on the budget, from before it is sent until its answer.

    The sender holds it for the attempt and reports the attempt's end to it, so what is
    counted is exactly this attempt's, whatever other attempts do (as `limits.Ticket`).
    """

    budget: Budget
    model: str
    body: dict[str, Any]
    raw_prompt: int = -1  # the estimator's prompt tokens (-1: not estimated yet)
    prompt: int = 0  # reserved prompt tokens (the estimate, scaled by what usage showed)
    output: int = 0  # reserved output tokens (the output ceiling)
    usd: float = 0.0
    capped: bool = True  # the line sets its own output cap
    held: bool = False  # counted in the budget's reserved sums
    sent: bool = False  # its dispatch record is written: it may be billed from now on
    known: bool = False  # sent with an estimate (else counted as of unknown spend in flight)
    settled: bool = False

    @property
    def tokens(self) -> int:
        return self.prompt + self.output

    def estimate(self) -> None:
        if self.raw_prompt < 0:
            self.budget._estimate(self)

    def journal(self) -> list[Any] | None:
        """What the dispatch record carries, with or without a budget: [model, prompt,
        output], the worst case a crash that cuts this attempt off counts."""
        self.estimate()
        return [self.model, self.prompt, self.output]

    def dispatched(self) -> None:
        """Its bytes are about to leave: from now on a crash counts its worst case."""
        self.sent = True
        self.estimate()
        self.known = True
        self.budget._in_flight_add(self, 1)

    def succeeded(self, body: dict[str, Any], used: tuple[int, int, int] | None) -> None:
        """The answer's usage (`spend.usage_tokens` of `body`, parsed once by the sender)
        replaces the reservation."""
        if self.settled:
            return
        b = self.budget
        if used is None:  # no usage (e.g. a stream without it): count what arrived
            self.estimate()
            used = (self.prompt, answer_text_tokens(body), 0)
        elif self.raw_prompt >= 0:  # estimated (under a budget): learn from the usage
            b._learn(self, used[0], used[1])
        self._settle(*used)

    def failed(self, failure: AttemptFailed) -> None:
        """Nothing when the server provably did no work; else the worst case."""
        if self.settled:
            return
        if failure.cls.policy.refund:
            self._settle(None)
            return
        self.estimate()
        self._settle(self.prompt, self.output, 0)

    def end(self) -> None:
        """The attempt is over without an answer (stopped, cancelled): a reservation never
        sent is given back; one sent stays reserved, as its outcome is unknown."""
        if self.settled:
            return
        if not self.sent:
            self._settle(None)

    def _settle(self, prompt: int | None, completion: int = 0, cached: int = 0) -> None:
        self.settled = True
        b = self.budget
        if self.sent:
            b._in_flight_add(self, -1)
        if self.held:
            b._release(self)
        if prompt is not None:
            b._count(self, prompt, completion, cached)
        if self.sent:
            b._touch()  # the journal's next write carries a snapshot of this
        if b.shared is not None:
            b.changed()


class _Free:
    """The reservation of an unbilled attempt (/tokenize, /detokenize): counts nothing."""

    sent = settled = held = False

    def journal(self) -> None:
        return None

    def dispatched(self) -> None: ...
    def succeeded(self, body: dict[str, Any], used: tuple[int, int, int] | None) -> None: ...
    def failed(self, failure: AttemptFailed) -> None: ...
    def end(self) -> None: ...


FREE = _Free()
Hold = Reservation | _Free  # what an attempt holds: a billed one's reservation, or FREE
