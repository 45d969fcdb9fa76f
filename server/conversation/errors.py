"""The one error type of the conversation layer, carrying what an OpenAI error body needs."""

from __future__ import annotations


class ConversationError(Exception):
    """A request the conversation layer refuses: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def __repr__(self) -> str:
        return f"ConversationError({self.status}, {self.message!r}, code={self.code!r})"


def session_not_found(session_id: str) -> ConversationError:
    return ConversationError(
        404,
        f"no session {session_id!r}",
        type="not_found_error",
        param="session_id",
        code="session_not_found",
    )


def session_busy(session_id: str) -> ConversationError:
    return ConversationError(
        409,
        f"session {session_id!r} already has a request in progress",
        type="conflict_error",
        param="session_id",
        code="session_busy",
    )


def session_conflict(message: str) -> ConversationError:
    return ConversationError(409, message, type="conflict_error", param="messages", code="session_conflict")


def invalid(message: str, param: str, code: str = "invalid_value") -> ConversationError:
    return ConversationError(400, message, param=param, code=code)


def session_claim_lost(session_id: str) -> ConversationError:
    return ConversationError(
        409,
        f"session {session_id!r} was taken over by another replica while this turn ran (this replica's "
        "claim expired); the turn was not saved: send it again",
        type="conflict_error",
        param="session_id",
        code="session_claim_lost",
    )


def session_model_mismatch(session_id: str, recorded: str, served: str) -> ConversationError:
    return ConversationError(
        409,
        f"session {session_id!r} belongs to another model ({recorded}); this server runs {served}: "
        "start a new session or DELETE this one",
        type="conflict_error",
        param="session_id",
        code="session_model_mismatch",
    )
