"""The ground floor: what every other package stands on, importing nothing of grass_ft itself.

``errors`` (:class:`~grass_ft.base.errors.UserError`, the one type for everything a user can cause), ``atomic``
(files and directories that appear complete or not at all), ``registry`` (the method table: each method's name and
what it can do) and ``tasks`` (LLM-Adapters' answer rules per evaluation task). These are tables and small tools read
from every floor; a module here imports the standard library and torch at most, never another grass_ft package.
"""
