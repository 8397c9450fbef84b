from tifactory.jobs import run_job
from tifactory.photos.collect import CollectSettings, collect_photos


def main(smk, log):
    kept = dict(smk.params.collect)  # the settings that change what a run keeps (a rerun when they change)
    prepared = kept.pop("prepared", False)
    network = {key: smk.config["collect"][key] for key in smk.params.network_keys}
    settings = CollectSettings.from_config({"collect": {**kept, **network}})
    manifest = collect_photos(list(smk.params.sources), smk.output[0], settings, workers=smk.threads,
                              prepared=prepared)
    counts = manifest["status"].value_counts().to_dict()
    log(f"collected {len(manifest)} item(s): {counts}")
    for row in manifest[manifest["status"] == "rejected"].itertuples():
        log(f"rejected {row.source}: {row.reason}")


run_job(snakemake, main)
