"""Stored-password checks against hashes recorded from real servers (Oracle MySQL 9.7.4 from
Debian sid, MariaDB 10.11 on bookworm), so no login is needed to know a password is current."""

from __future__ import annotations

import pytest

from roles.db_passwords import native_password_hash, stored_password_matches

# MySQL 9.7.4: CREATE USER vec1@localhost IDENTIFIED BY 'S3cret-pw' → HEX(authentication_string)
MYSQL_97_S3CRET = (
    "2441243030412474455335103C012E4831446C361B4E3B6742790D492E434B443642444C4A634B596D58"
    "6243536A6E6B3936624E564F432E4458385A6E556B46686770664239"
)
# the same server with caching_sha2_password_storage_format=PBKDF2_SHA512, a non-ASCII password
MYSQL_97_PBKDF2 = (
    "244224303041244854505B53250E4C200F04067F1C0A196664471836654264616A51666F712F4E747635"
    "7A64366B4A682F622B736163354D4573644D44444B536D71434E702B686D6756314A557879785A4A617A"
    "474D662F6867704D646F7356322B5A672B357A3248736B325A7A5763673D3D"
)


def test_native_password_hash_matches_mariadb():
    # recorded from MariaDB 10.11 on the sandbox: SELECT PASSWORD('mlflow')
    assert native_password_hash("mlflow") == "*AC2B0B9B71979126F965FAF297BF132698E1BB53"


@pytest.mark.parametrize(
    ("stored", "password", "other"),
    [
        (MYSQL_97_S3CRET, "S3cret-pw", "S3cret-pX"),
        (MYSQL_97_PBKDF2, "pässword with spaces", "pässword with space"),
    ],
)
def test_caching_sha2_password_is_verified_from_the_stored_string(stored, password, other):
    assert stored_password_matches("caching_sha2_password", stored, password)
    assert not stored_password_matches("caching_sha2_password", stored, other)


def test_native_rows_compare_the_hash():
    stored = native_password_hash("pw").encode().hex()
    assert stored_password_matches("mysql_native_password", stored, "pw")
    assert not stored_password_matches("mysql_native_password", stored, "pw2")


@pytest.mark.parametrize(
    ("plugin", "stored"),
    [
        ("caching_sha2_password", ""),  # no password at all
        ("caching_sha2_password", "zz"),  # not hex
        ("caching_sha2_password", "2441243030"),  # cut short
        ("auth_socket", ""),  # a plugin we do not set: the password is set again
        ("ed25519", "41"),
    ],
)
def test_anything_unverifiable_counts_as_a_different_password(plugin, stored):
    assert not stored_password_matches(plugin, stored, "pw")
