"""Interpretation readouts as arrays and dataclasses, one room each: the key frame and slot
references (`frame`), the nearest real tokens of each prefix position (`nearest`), the tokens
its values promote (`values`), attention paid to it (`attention`), the cached reference bank
(`bank`), PCA maps among real tokens (`maps`), knockouts of slots and layers (`knockout`),
what training changed and the reset-to-start ablation (`change`, `ablation`), what a prefix
does to each decision, word by word (`explain`), the model's own description of a prefix
(`describe`), a text prompt that decides as a prefix does (`readable`), and the summary
in words (`summary`).

Imports `engine` and `data`; draws nothing (that is `figures`).
"""
