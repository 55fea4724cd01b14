"""Filters: named, configurable stages that clean user logs before datasets are built from them.

Each filter decides about one kind of item and says why it drops each one:

    quality       targets           empty, truncated, unsafe (a small lexicon), repetitive (a sentence
                                    said twice, or most of it said in the previous turns): such turns
                                    stay in the logs as context and as rejected answers, but are never
                                    a training target (table `target_flags`); each rule judges only
                                    the authors it applies to (truncated: models, not people)
    bots          users             bot-like: replays the same messages, replies faster or more
                                    regularly than a person types, picks without reading
    min_reading   users             skimmers: most of their reads take ~0 seconds, so their picks,
                                    swipes, thumbs and reads are dropped as preference signal
    repeats       conversations     over-repeated: exact or near-duplicate user messages across
                                    conversations (MinHash); at most `max_copies` of each are kept
    diversity     conversations     exact duplicate conversations; no character or topic above a share
    user_cap      conversations     at most N conversations (and/or training examples) per user;
                                    or keep them all and down-weight (table `weights`)

Filters never read ground truth; `filter_precision_recall` (evaluation only) compares what they
dropped with the simulator's labels.

Every filter runs in three steps so the same code runs on one machine or per partition on Ray
Data: `signature(frames)` (per partition of users: small per-user or per-conversation facts),
`resolve(signatures)` (once, on all signatures: the decisions), `apply(frames, decisions)` (per
partition again). A filter is local (decides inside one user partition: quality, bots, min_reading,
user_cap) or global (needs every partition's signature: repeats, diversity). `run_filters` runs
them in memory, on one partition or several; `run_filters_on_disk` streams a log folder through
user partitions on disk, one in memory at a time, so memory follows the partition, not the logs.

One module per filter (`quality`, `bots`, `min_reading`, `repeats`, `diversity`, `user_cap`), the
interface and frame helpers in `base`, the passes over partitions in `run` (shared with the Ray
engine), the reports in `report`, precision/recall against ground truth in `evaluate`, the funnel
plot in `plot`.

Besides the log tables (same schemas, fewer rows), the result has `labels` (derived from the
unfiltered logs, so that outcomes like "returned within 7 days" still see every session), and
`weights` and `target_flags` (schemas below).
"""

from alignloop.data.filters.base import (
    DROPPED,
    FILTER_SCHEMAS,
    FILTERED_SCHEMAS,
    TABLE_ORDER,
    TARGET_FLAGS,
    WEIGHTS,
    Filter,
    Frames,
    arrow_table,
    conv_user,
    drop_conversations,
    drop_users,
    empty_frame,
    fast_words,
    no_decisions,
    prepare,
    read_stats,
    rows,
    to_arrow,
)
from alignloop.data.filters.bots import BotConfig, BotFilter
from alignloop.data.filters.config import (
    DEFAULT_ORDER,
    FILTERS,
    FilterConfig,
    FilterName,
    make_filters,
)
from alignloop.data.filters.diversity import (
    DEFAULT_TOPICS,
    DiversityConfig,
    DiversityFilter,
    share_caps,
)
from alignloop.data.filters.evaluate import TRUTH_COLUMNS, filter_precision_recall, read_ground_truth
from alignloop.data.filters.min_reading import (
    PREFERENCE_EVENTS,
    MinReadingConfig,
    MinReadingFilter,
)
from alignloop.data.filters.plot import funnel_plot
from alignloop.data.filters.quality import (
    DEFAULT_UNSAFE,
    EDGE_CHARS,
    ENDS_WELL,
    HUMAN_SOURCES,
    RULES,
    SENTENCE_BREAK,
    QualityConfig,
    QualityFilter,
    RuleScope,
)
from alignloop.data.filters.repeats import RepeatConfig, RepeatFilter
from alignloop.data.filters.report import (
    FilterReport,
    FunnelReport,
    dropped_rows,
    filter_report,
)
from alignloop.data.filters.run import (
    DiskStore,
    MemoryStore,
    Pass,
    PassOutput,
    Tallies,
    auto_partitions,
    check_decisions,
    concat_partitions,
    drive,
    load_raw_partition,
    load_state,
    memory_partitions,
    own,
    plan_passes,
    run_filters,
    run_filters_on_disk,
    run_pass,
    save_state,
    split_partitions,
)
from alignloop.data.filters.user_cap import UserCapConfig, UserCapFilter

__all__ = [
    "DEFAULT_ORDER", "DEFAULT_TOPICS", "DEFAULT_UNSAFE", "DROPPED", "EDGE_CHARS", "ENDS_WELL", "FILTERED_SCHEMAS",
    "FILTERS", "FILTER_SCHEMAS", "HUMAN_SOURCES", "PREFERENCE_EVENTS", "RULES", "SENTENCE_BREAK", "TABLE_ORDER",
    "TARGET_FLAGS", "TRUTH_COLUMNS", "WEIGHTS", "BotConfig", "BotFilter", "DiskStore", "DiversityConfig",
    "DiversityFilter", "Filter", "FilterConfig", "FilterName", "FilterReport", "Frames", "FunnelReport",
    "MemoryStore", "MinReadingConfig", "MinReadingFilter", "Pass", "PassOutput", "QualityConfig", "QualityFilter",
    "RepeatConfig", "RepeatFilter", "RuleScope", "Tallies", "UserCapConfig", "UserCapFilter", "arrow_table",
    "auto_partitions", "check_decisions", "concat_partitions", "conv_user", "drive", "drop_conversations",
    "drop_users", "dropped_rows", "empty_frame", "fast_words", "filter_precision_recall", "filter_report",
    "funnel_plot", "load_raw_partition", "load_state", "make_filters", "memory_partitions", "no_decisions", "own",
    "plan_passes", "prepare", "read_ground_truth", "read_stats", "rows", "run_filters", "run_filters_on_disk",
    "run_pass", "save_state", "share_caps", "split_partitions", "to_arrow",
]
