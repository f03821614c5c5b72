"""Entry point of the zipapp and of `python -m oneiscsi`."""
import sys


def main() -> None:
    from oneiscsi.dispatch import main as dispatch_main
    sys.exit(dispatch_main(sys.argv))


if __name__ == "__main__":
    main()
