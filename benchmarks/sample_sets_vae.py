"""Can the mini base's VAE carry the sample sets? Detector rates before and after a round trip.

    OMP_NUM_THREADS=1 python benchmarks/sample_sets_vae.py [sample_data/mini-sd/vae] [--n 24]

For each detector (stripes, outline, kbot) and each image set (the three sample sets as
``trainers/sample_sets.py`` draws them, and plain shapes-world images) prints the detection rate
on the images themselves and on their VAE round trip (encode -> latent mean -> decode). Adapters
train only the UNet / text encoder, so a set whose round trip loses its detector is unlearnable.
Targets: own set >= 0.90, own round trip >= 0.80, everything else <= 0.10.
"""

import argparse
import time

import torch


def measure(vae, n: int = 24, plain: int = 96) -> dict[str, dict[str, tuple[float, float]]]:
    """{detector: {set: (rate on the images, rate on their VAE round trip)}}."""
    from studio.shapes import styles
    from trainers.sample_sets import SETS

    images = {name: styles.sample_images(name, seed, n)[0] for name, seed in SETS.values()}
    images["plain"] = styles.plain_images(12, plain)
    trips = {k: styles.vae_round_trip(vae, v) for k, v in images.items()}
    return {det: {k: (styles.detection_rate(det, images[k]), styles.detection_rate(det, trips[k]))
                  for k in images} for det in styles.DETECTORS}


def main() -> None:
    from diffusers import AutoencoderKL

    p = argparse.ArgumentParser()
    p.add_argument("vae", nargs="?", default="sample_data/mini-sd/vae")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    t = time.time()
    table = measure(vae, args.n)
    print(f"{'detector':9s} {'set':8s} {'images':>7s} {'VAE trip':>9s}")
    for det, rows in table.items():
        for name, (own, trip) in rows.items():
            print(f"{det:9s} {name:8s} {own:7.2f} {trip:9.2f}")
    for det, rows in table.items():
        print(f"BENCH {det}_own {rows[det][0]:.2f}")
        print(f"BENCH {det}_vae_round_trip {rows[det][1]:.2f}")
        print(f"BENCH {det}_false_positive_max {max(max(v) for k, v in rows.items() if k != det):.2f}")
    print(f"seconds {time.time() - t:.1f}")


if __name__ == "__main__":
    main()
