"""What every entry point shares: the --mesh flag and one-line errors for user mistakes."""

import sys

from absl import app, flags

from cvxdpo.errors import CvxdpoError

MESH = flags.DEFINE_string(
    "mesh", "-1,1,1",
    "Mesh shape over (data, fsdp, tensor); -1 fills with the devices present. E.g. 8,1,1 or 2,2,2.")


def run(main):
    """absl.app.run(main), printing a CvxdpoError as one line (exit 2) instead of a traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except CvxdpoError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
