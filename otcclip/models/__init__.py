"""The pure core of otcclip: features, optimal transport, matching, decisions, training,
attacks and evaluation.

Nothing here touches the web layer, the database or the queue; every long-running
function takes ``progress`` / ``should_stop`` callbacks (:mod:`otcclip.models.progress`).
Import the submodule you need (``from otcclip.models.sanitize import sanitize``): this
package imports nothing itself, so reading a config never loads torch.
"""
