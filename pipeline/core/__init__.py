"""The bottom layer: plain data and helpers every other layer uses (errors, atomic files,
profiles, configs, policies, the search space's types, statistics). Imports no other layer."""
