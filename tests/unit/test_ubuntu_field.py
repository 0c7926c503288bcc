"""Ubuntu, verified as plans: no Ubuntu archive is reachable from this machine, so the paths an
Ubuntu host takes are checked against recorded facts. os-release texts are the releases' own;
package, unit and MySQL defaults are from Ubuntu's package pages and MySQL's documentation
(not run here). What runs for real here: MySQL 9.7 on Debian sid (tests/e2e/test_field_e2e.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mlflow_stack import layout
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.steps import Apt, File, MaskedUnit
from roles import mysql
from roles.db_passwords import stored_password_matches
from tests.unit.test_facts import UBUNTU_2204, UBUNTU_2404
from tests.unit.test_roles import context

UBUNTU_2604 = """PRETTY_NAME="Ubuntu 26.04 LTS"
NAME="Ubuntu"
VERSION_ID="26.04"
VERSION="26.04 LTS (Resolute Raccoon)"
VERSION_CODENAME=resolute
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=resolute
LOGO=ubuntu-logo
"""

# caching_sha2_password with 5000 digest rounds ($A$005$, MySQL 8.0's and 8.4's default),
# made by MySQL 9.7.4 started with --caching-sha2-password-digest-rounds=5000:
# CREATE USER … IDENTIFIED BY 'mlflow-8.0-style'
ROUNDS_5000 = (
    "244124303035247C02147776573D413F2E61486B7D61410C2B37506937745047507133494369704268"
    "516942304854536B513531684F56415538334B303539506B525670572F"
)


@dataclass(frozen=True)
class Release:
    os_release: str
    codename: str
    mysql: str  # the mysql-server package's upstream series
    native_password: str  # mysql_native_password: deprecated, off by default, or gone


UBUNTU = {
    "22.04": Release(UBUNTU_2204, "jammy", "8.0", "deprecated (loaded)"),
    "24.04": Release(UBUNTU_2404, "noble", "8.0", "deprecated (loaded)"),
    "26.04": Release(UBUNTU_2604, "resolute", "8.4", "not loaded unless enabled"),
}


@pytest.mark.parametrize("version", sorted(UBUNTU))
def test_ubuntu_gets_mysql_with_its_default_plugin(version):
    release = UBUNTU[version]
    os_info = F.OsRelease().parse(release.os_release, 0)
    assert (os_info.family, os_info.version_id, os_info.codename) == (
        "ubuntu",
        version,
        release.codename,
    )
    assert layout.db_server(os_info) == layout.MYSQL
    steps = mysql.build(context(release.os_release))
    assert next(s for s in steps if isinstance(s, Apt)).packages == ("mysql-server",)
    assert not [s for s in steps if isinstance(s, MaskedUnit)]  # no socket unit to mask
    conf = next(s for s in steps if isinstance(s, File) and s.path.endswith(".cnf"))
    assert conf.path == "/etc/mysql/mysql.conf.d/zz-mlflow-stack.cnf"
    assert "skip-log-bin" in conf.content and "mysqlx = OFF" in conf.content
    (db,) = [s for s in steps if isinstance(s, mysql.SecureDatabase)]
    sql = "".join(s for _, s in mysql.plan_sql(mysql.DbState(), db.wanted))
    # whatever the series does with mysql_native_password, we never ask for it
    assert "IDENTIFIED BY" in sql and "mysql_native_password" not in sql


def test_an_8_0_style_hash_with_5000_rounds_is_verified():
    assert stored_password_matches("caching_sha2_password", ROUNDS_5000, "mlflow-8.0-style")
    assert not stored_password_matches("caching_sha2_password", ROUNDS_5000, "mlflow-8.4-style")


def test_mysql_can_be_chosen_on_debian_and_mariadb_on_ubuntu():
    debian = context(mysql={"server": "mysql"})
    assert mysql.build(debian)[0].packages == ("mysql-server",)
    ubuntu = context(UBUNTU_2404, mysql={"server": "mariadb"})
    assert mysql.build(ubuntu)[0].packages == ("mariadb-server",)
