"""Pure rollout logic: update policies, wave membership, metric gates and statistics.

Nothing here touches the ORM or Django; services load rows and call these functions.
"""
