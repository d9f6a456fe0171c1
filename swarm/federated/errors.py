"""The errors of federated fine-tuning: a bad setting, a refused update, a step that could not be done."""


class FederatedConfigError(ValueError):
    """A federated setting is invalid (out of range, missing, or contradictory); the message names the field."""


class RejectedUpdate(ValueError):
    """An update from another client fails a check (shape, NaN / inf, norm); the message says which."""


class FederatedError(RuntimeError):
    """A federated step could not be done (e.g. no member of the run could give its adapter to a late joiner)."""
