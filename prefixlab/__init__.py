"""PrefixLab: prefix tuning of a frozen causal language model, from the CLI or the browser."""
