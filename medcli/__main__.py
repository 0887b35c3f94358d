from medcli.cli import main

__all__ = []  # `python -m medcli`: nothing to import from here

if __name__ == "__main__":
    main()
