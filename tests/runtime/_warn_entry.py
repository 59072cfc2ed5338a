"""pretrain.py with the warning filter installed first (what cli/pretrain.py does once it calls
install_warning_filters before any megatron.core import)."""

import sys

from nvfp4_megatron.runtime.warnings_filter import install_warning_filters

install_warning_filters(sys.argv[1:])

from nvfp4_megatron.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
