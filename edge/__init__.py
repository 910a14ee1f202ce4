"""The device side of edgefl: model store, inference, training, local data, agent.

The project is published as the distribution :data:`DIST_NAME`. The plain name
``edgefl`` on the public index belongs to an unrelated project, so nothing may install
or look up a distribution by that name.
"""

#: The distribution name of this project (``pip install 'edgefl-fleet[edge]'``). The
#: command stays ``edgefl`` and the import packages stay ``edge``, ``cloud``,
#: ``protos`` and ``devices``.
DIST_NAME = "edgefl-fleet"


def version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DIST_NAME)
    except PackageNotFoundError:
        return "0+unknown"
