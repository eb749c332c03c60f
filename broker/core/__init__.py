"""Pure security logic with no I/O: scopes and grants, proxy rules, URL rewriting, tokens."""
