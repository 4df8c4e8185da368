"""Transfer fees: 25 cents flat plus 1.5% of the amount, rounded down to whole cents."""

FLAT_CENTS = 25
RATE = 0.015


def fee(cents):
    return FLAT_CENTS + int(cents * RATE)
