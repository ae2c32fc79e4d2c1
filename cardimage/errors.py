"""Errors raised while decoding or encoding a card image."""


class CardImageError(Exception):
    """The bytes are not a valid image (or area) of this scheme."""


class IntegrityError(CardImageError):
    """A MAC did not verify: the area is torn, corrupted or forged."""


class InvalidCard(CardImageError):
    """The card as a whole cannot be trusted (no valid identity or purse)."""
