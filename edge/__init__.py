"""The device side of edgefl: model store, inference, training, local data, agent.

The project is published as the distribution :data:`DIST_NAME`. The plain name
``edgefl`` on the public index belongs to an unrelated project, so nothing may install
or look up a distribution by that name.
"""

#: The distribution name of this project (``pip install 'edgefl-fleet[edge]'``). The
#: command stays ``edgefl`` and the import packages stay ``edge``, ``cloud``,
#: ``protos`` and ``devices``.
DIST_NAME = "edgefl-fleet"
