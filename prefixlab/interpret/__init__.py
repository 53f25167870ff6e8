"""Interpretation readouts as arrays and dataclasses, one room each: the key frame and slot
references (`frame`), the nearest real tokens of each prefix position (`nearest`), the tokens
its values promote (`values`), attention paid to it (`attention`), the cached reference bank
(`bank`), PCA maps among real tokens (`maps`), knockouts of slots and layers (`knockout`),
and the summary in words (`summary`).

Imports `engine` and `data`; draws nothing (that is `figures`).
"""
