"""Names and fixed texts of the report: its folder, the reference method (Retrain), the
methods' display names, the fields that split a setting or a row, and the table notes."""

REPORT_DIR = "report"
REFERENCE = "retrain"
#: The row of a budget-matched Retrain (``retrain.budget=matched``): beside the reference.
MATCHED_REFERENCE = "retrain-matched"
BEST_MARK = "★"
DISPLAY = {"retrain": "Retrain", "retrain-matched": "Retrain (matched)", "ft": "FT", "not": "NoT", "federaser": "FedEraser",
           "fukd": "FUKD", "pgd": "PGD", "mode": "MoDE", "fcu": "FCU", "puf": "PUF",
           "randl": "RandL", "ga": "GA", "badt": "BadT", "l1_sparse": "ℓ1-sparse",
           "ssd": "SSD", "salun": "SalUn", "lwo": "LWO"}
LABELS = {"retain": "Retain", "forget": "Forget", "test": "Test", "mia": "MIA", "asr": "ASR"}
# Settings that change the Retrain reference: results differing in them are never averaged.
PROTOCOL_FIELDS = ("val_fraction", "batch_size", "local_epochs", "momentum",
                   "pretrain_rounds", "pretrain_lr", "mia_max_members", "server_data_fraction")
# Method settings: they split a method's row, never the setting (Retrain ignores them).
METHOD_FIELDS = ("unlearn_rounds", "unlearn_lr", "unlearn_local_epochs", "unlearn_clip_norm",
                 "unlearn_server_momentum", "recovery_stop", "recovery_validate_every",
                 "recovery_target_gap", "recovery_patience", "recovery_min_delta",
                 "negate_layers", "negate_bias", "params")
# "params" is the method's own typed parameters (results.json "params"), not a config field.
COST_KEYS = ("comm_bytes", "flops", "storage_bytes", "rounds", "wall_s")
STD_NOTE = ("mean ± std over seeds (sample std, ddof=1; 0 for one seed); (x) = |Δ| to "
            "Retrain; Avg. Gap = mean |Δ| over Retain, Forget, Test, MIA; "
            f"{BEST_MARK} = lowest Avg. Gap among non-Retrain methods. Accuracies and MIA "
            "in %, Comm. in bytes, Comp. in FLOPs (unlearning step + recovery), Storage in bytes "
            "kept between rounds (the training history a method reads, MoDE's degradation "
            "model; 0 for the others).")
NO_RETRAIN_NOTE = ("No Retrain results for this setting: Δ and Avg. Gap need the Retrain "
                   "reference (add method=retrain to the sweep).")
