from tifactory.photos.collect import collect_photos
from tifactory.jobs import run_job


def main(smk, log):
    network = {key: smk.config["collect"][key] for key in smk.params.network_keys if key in smk.config["collect"]}
    manifest = collect_photos(list(smk.params.sources), smk.output[0], workers=smk.threads,
                              **smk.params.collect, **network)
    counts = manifest["status"].value_counts().to_dict()
    log(f"collected {len(manifest)} item(s): {counts}")
    for row in manifest[manifest["status"] == "rejected"].itertuples():
        log(f"rejected {row.source}: {row.reason}")


run_job(snakemake, main)
