"""PrefixLab: prefix tuning of a frozen causal language model, from the command line or the browser."""
