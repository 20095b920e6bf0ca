"""`chatforge encrypt`, `chatforge decrypt` and `chatforge keygen`: flags -> chatforge.privacy.crypto -> one line
per file. The key comes from --key-file, or --passphrase (read from CHATFORGE_PASSPHRASE, else asked for), or the
CHATFORGE_KEY environment variable; it is never printed."""

from __future__ import annotations

import os

from chatforge.errors import ChatforgeError
from chatforge.privacy import crypto


def command_key(key_file: str | None, passphrase: bool, confirm: bool = False) -> crypto.Key:
    """The key a command was given (--key-file, or --passphrase: CHATFORGE_PASSPHRASE, else asked for), else
    the CHATFORGE_KEY variable; shared by every command that reads or writes encrypted files."""
    if not passphrase:
        return crypto.resolve_key(key_file=key_file)
    if key_file:
        raise ChatforgeError("give --key-file or --passphrase, not both")
    value = os.environ.get(crypto.PASSPHRASE_ENV)
    if value is None:
        import getpass

        value = getpass.getpass("passphrase: ")
        if confirm and getpass.getpass("passphrase again: ") != value:
            raise ChatforgeError("the two passphrases differ")
    return crypto.key_from_passphrase(value)


def given_key(key_file: str | None, passphrase: bool) -> crypto.Key | None:
    """The key from --key-file / --passphrase, for a command that reads a model or a dataset that may be encrypted;
    None leaves it to the reader (the environment's key when it meets an encrypted file, nothing for a plain one)."""
    if not key_file and not passphrase:
        return None
    return command_key(key_file, passphrase)


def encrypt_command(path: str, *, out: str, key_file: str | None = None, passphrase: bool = False,
                    chunk_size: int = crypto.DEFAULT_CHUNK) -> int:
    """Encrypt a file, or a folder (a model folder, a dataset) file by file as NAME.cfenc.

    Args:
        path: the file or folder to encrypt
        out: where the encrypted file or folder goes (must not exist)
        key_file: a file holding the key (base64 of 32 bytes, mode 0600); default: the CHATFORGE_KEY variable
        passphrase: use a passphrase (Argon2id) instead of a key: CHATFORGE_PASSPHRASE, else asked for
        chunk_size: bytes of plaintext per authenticated chunk
    """
    done = crypto.encrypt_path(path, out, command_key(key_file, passphrase, confirm=True), chunk_size)
    for target, n in done:
        print(f"{target}  ({n:,} bytes encrypted)")
    return 0


def decrypt_command(path: str, *, out: str, key_file: str | None = None, passphrase: bool = False) -> int:
    """Decrypt a file or a folder made by `chatforge encrypt`; every chunk is verified, nothing partial is written.

    Args:
        path: the encrypted file or folder
        out: where the plaintext goes (must not exist; files are created readable by their owner only)
        key_file: a file holding the key (base64 of 32 bytes, mode 0600); default: the CHATFORGE_KEY variable
        passphrase: the file was encrypted with a passphrase: CHATFORGE_PASSPHRASE, else asked for
    """
    done = crypto.decrypt_path(path, out, command_key(key_file, passphrase, confirm=False))
    for target, n in done:
        print(f"{target}  ({n:,} bytes decrypted)")
    return 0


def keygen_command(path: str) -> int:
    """Write a new random key (base64 of 32 bytes) to a file only its owner can read.

    Args:
        path: the key file to create (never overwritten)
    """
    crypto.write_key_file(path)
    print(f"{path}: new key written (mode 0600); keep it apart from what it encrypts")
    return 0
