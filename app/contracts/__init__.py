"""Tables under contract: the tables file (`TABLES_FILE`), its hot reload and the edge check.

`file` parses and validates the TOML file into `TablesConfig`; `reload` keeps the last
good version while the file changes; `check` decides, per activity shape, what the
contract does with it. See docs/contracts.md.
"""
