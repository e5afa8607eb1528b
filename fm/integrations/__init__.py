"""fm inside other trainers, one optional module each (`fm.integrations.tunix`, ...).

Importing this package imports no trainer; each integration module needs its trainer's extra
installed and says so when it is missing.
"""
