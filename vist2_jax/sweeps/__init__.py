"""Sweeps as first-class objects: a sweep file expands into variants (sizes x grid values),
each a chain of stages with its own run folder (``spec``); the runner launches each stage
once the stage before it finished, skips finished ones and retries failed ones
(``runner``); the state of every stage is read from its run folder through the path layer,
so ``vist2 sweep status`` works from any machine (``state``); ``report`` puts the runs side
by side. A stage is finished when its run folder says so (final checkpoint + summary.json),
marin's executor idea: outputs, not bookkeeping, decide what is left to do."""
