"""A double-entry ledger: every transfer debits one account and credits another."""


class InsufficientFunds(Exception):
    pass


class Ledger:
    def __init__(self):
        self.balances = {}

    def open(self, account, cents=0):
        self.balances[account] = cents

    def transfer(self, source, target, cents):
        if cents <= 0:
            raise ValueError("a transfer moves a positive amount")
        if self.balances[source] < cents:
            raise InsufficientFunds(source)
        self.balances[source] -= cents
        self.balances[target] += cents

    def total(self):
        return sum(self.balances.values())
